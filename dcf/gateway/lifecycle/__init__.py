"""The function lifecycle: desired state, running versions, their replicas and their scale."""
