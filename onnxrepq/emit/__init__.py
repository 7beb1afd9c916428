"""Runtime targets: the only place QDQ layout rules live."""
