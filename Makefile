# ty-openworkflow: `make demo` runs the Quick Start end to end, `make test` runs the suite.
PYTHON ?= python3

.PHONY: test demo dist install bench lint clean docker-up docker-down cf-tools plugin-files

# The whole suite. It sets up what it can without root first: miniflare for the cloudflare
# tests (CI's copy in .ci/ if `make cf-tools` made one, else MINIFLARE_CACHE, outside the
# checkout, installed from npm once). The run ends with a line naming what was skipped and
# the command that enables it (a Docker engine: `sudo make docker-up`).
MINIFLARE_VERSION ?= 4.20260426.0
MINIFLARE_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ty-openworkflow/miniflare-$(MINIFLARE_VERSION)
test:
	@mf=$$(bash .ci/miniflare.sh "$(MINIFLARE_VERSION)" "$(MINIFLARE_CACHE)") && \
	echo "TYOW_MINIFLARE_DIR=$$mf $(PYTHON) -m tests" && TYOW_MINIFLARE_DIR="$$mf" $(PYTHON) -m tests

demo:
	PYTHON=$(PYTHON) bash examples/demo.sh

dist:
	@mkdir -p dist
	$(PYTHON) ty_openworkflow.py dist dist/ty_openworkflow.py

# The single-file build as a command: $(PREFIX)/bin/ty-openworkflow, a six-line
# launcher that imports the build from $(PREFIX)/lib/ty-openworkflow, so Python
# caches its bytecode and the command starts fast (the build itself also runs alone).
PREFIX ?= $(HOME)/.local
install: dist
	install -d $(PREFIX)/bin $(PREFIX)/lib/ty-openworkflow
	install -m 644 dist/ty_openworkflow.py $(PREFIX)/lib/ty-openworkflow/ty_openworkflow.py
	printf '#!/usr/bin/env python3\nimport sys\nsys.dont_write_bytecode = False  # cache the bytecode beside the module: a fast start\nsys.path.insert(0, "%s")\nfrom ty_openworkflow import main\nsys.exit(main())\n' \
		"$(abspath $(PREFIX))/lib/ty-openworkflow" > $(PREFIX)/bin/ty-openworkflow
	chmod 755 $(PREFIX)/bin/ty-openworkflow

# The TaskYou plugin a clone carries (runtimes/openworkflow, found by `ty plugins add` of the
# repository), written from the module; tests/test_plugin.py checks it is up to date.
plugin-files:
	$(PYTHON) -c 'import ty_openworkflow as t; t.write_plugin("runtimes/openworkflow", t.plugin_files(t.CLONE_LAUNCHER))'

bench:
	$(PYTHON) tests/bench.py
	$(PYTHON) tests/bench_dashboard.py
	$(PYTHON) tests/bench_cloudflare.py
	$(PYTHON) tests/bench_soak.py

# A real Docker engine for the docker tests (root; installs Debian's docker.io if
# needed, builds an offline runtime image). `make test` finds it by itself.
docker-up:
	bash .ci/docker-engine.sh up

docker-down:
	bash .ci/docker-engine.sh down

# miniflare (a real Workers runtime, from npm) for the cloudflare tests, into .ci/ (CI's way;
# `make test` alone installs it outside the checkout instead).
cf-tools:
	npm install --prefix .ci miniflare@$(MINIFLARE_VERSION) --no-save --no-audit --no-fund

# The dashboard page's inline script, compiled (not run) by node; an error names the page's line.
CHECK_PAGE_SCRIPT = const page = "runtimes/dashboard.html"; \
	const parts = require("fs").readFileSync(page, "utf8").split(/<\/?script>/); \
	if (parts.length !== 3) throw new Error(page + ": expected one inline <script>"); \
	const lineOffset = parts[0].split("\n").length - 1; \
	new (require("vm").Script)(parts[1], {filename: page, lineOffset});

lint:
	$(PYTHON) -m py_compile ty_openworkflow.py runtimes/python_shim.py
	node --check runtimes/node_shim.js
	node --check --input-type=module < runtimes/cloudflare_worker.js
	node -e '$(CHECK_PAGE_SCRIPT)'

clean:
	rm -rf dist .test-tmp
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
