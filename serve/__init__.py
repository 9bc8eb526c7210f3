"""`gesso serve`'s service: an HTTP job API (app, http), the checks of what clients send (jobs), its queue in SQLite
(store), the runner that starts each job in a process of its own (runner) and that process (worker). An edge like
cli.py: it calls the public API and the engine, and nothing below imports it."""
