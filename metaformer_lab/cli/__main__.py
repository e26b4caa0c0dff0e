"""`python -m metaformer_lab.cli`: the console script without its wrapper."""

from metaformer_lab.cli import main

main()
