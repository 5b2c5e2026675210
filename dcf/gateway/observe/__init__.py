"""What the gateway tells its operator: metrics and logs."""
