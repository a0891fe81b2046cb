# ty-openworkflow: `make demo` runs the Quick Start end to end, `make test` runs the suite.
PYTHON ?= python3

.PHONY: test demo dist bench lint clean

test:
	$(PYTHON) -m tests

demo:
	PYTHON=$(PYTHON) bash examples/demo.sh

dist:
	@mkdir -p dist
	$(PYTHON) ty_openworkflow.py dist dist/ty_openworkflow.py

bench:
	$(PYTHON) tests/bench.py

lint:
	$(PYTHON) -m py_compile ty_openworkflow.py runtimes/python_shim.py
	node --check runtimes/node_shim.js

clean:
	rm -rf dist .test-tmp
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
