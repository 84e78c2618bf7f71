"""Email Router for Dynamics 365: the product (pure decisions, services, adapters)."""
