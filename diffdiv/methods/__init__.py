"""Per-method math (pure functions): one module per method (fdistill, uni_instruct, ...)."""
