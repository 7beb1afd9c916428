"""Scripts users and developers run (benchmarks, zoo training); not imported by the package."""
