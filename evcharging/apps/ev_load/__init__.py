"""Driver load: many EV drivers in one process (``python -m evcharging.apps.ev_load.main``)."""
