"""``python -m smallcaps_ingest.simulator``: serve the simulated API on loopback."""

from smallcaps_ingest.simulator.cli import main

main()
