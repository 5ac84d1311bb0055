"""Built-in strategies: ``independent``, ``kl_dml``, ``ie_kd``, ``ie_dml``."""
