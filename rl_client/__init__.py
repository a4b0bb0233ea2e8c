"""Client side of warm-rm: reward client, trainer adapters, best-of-N and a PG trainer."""
