"""The working IR is onnx-graphsurgeon's Graph; this package only loads, saves and matches it."""
