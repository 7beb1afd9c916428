"""The re-parameterized model zoo: its offline dataset, network assembly and export."""
