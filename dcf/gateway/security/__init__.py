"""Who may do what: the management token, function keys, and what a handler may see."""
