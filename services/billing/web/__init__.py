"""The billing dashboard (a static page over the JSON API) and its few read endpoints."""
