# The two commands of the README. Both install first (idempotent; seconds once installed).
.PHONY: install sweep test lint

install:
	bash scripts/install.sh

sweep: install
	.venv/bin/snakemake --cores all

test: install
	.venv/bin/python -m pytest

lint:
	.venv/bin/snakemake --lint
