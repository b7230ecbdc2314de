# The two commands of README.md: `make demo` and `make test`. Both set up what is missing first.
.PHONY: setup demo demo-down test lint crds

setup:
	@scripts/setup

demo: setup
	.venv/bin/tandem demo

demo-down: setup
	.venv/bin/tandem demo --down

test: setup
	.venv/bin/ruff check controller agent tests bench
	.venv/bin/lint-imports
	.venv/bin/pytest

lint: setup
	.venv/bin/ruff check controller agent tests bench
	.venv/bin/ruff format --check controller agent tests bench
	.venv/bin/lint-imports

crds: setup
	.venv/bin/tandem crds
	.venv/bin/tandem crds --dir helm/tandem/crds
