"""Small infrastructure shared by the services: topic admin, health and metrics endpoints."""
