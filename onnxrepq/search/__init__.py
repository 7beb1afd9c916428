"""Scale-search criteria (minmax, percentile, mse, mae) behind one small interface."""
