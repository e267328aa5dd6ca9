"""HTTP layer: dependencies, response schemas and routes. The only place statuses are chosen."""
