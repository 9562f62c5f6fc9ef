"""The worker process: claims jobs, runs the engine on a (kept-warm) pair, writes checkpoint parts."""
