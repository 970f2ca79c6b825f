# agentic-django template: `make demo` runs a generated project, `make test` tests the template.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
TEMPLATE_PROJECT := {{cookiecutter.project_slug}}
PYTHON ?= $(shell "$(TEMPLATE_PROJECT)/scripts/find-python")
UV := $(shell command -v uv 2>/dev/null || echo .cache/uv/bin/uv)
VENV := .venv
DEMO_DIR := .demo
DEMO_PROJECT := $(DEMO_DIR)/agentic_demo
ARGS ?=

.PHONY: help demo system-packages test bench mutation lint clean

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

.cache/uv/bin/uv:
	"$(PYTHON)" -m venv .cache/uv
	.cache/uv/bin/pip install --quiet uv

$(VENV)/.installed: requirements.txt | $(UV)
	$(UV) venv --allow-existing --python "$(PYTHON)" $(VENV)
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet -r requirements.txt
	touch $@

demo: | $(UV) $(VENV)/.installed  ## generate a project (sqlite + database backend) and run it on :8000
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/cookiecutter --no-input . -o $(DEMO_DIR) \
		project_name="Agentic Demo" task_backend=database database=sqlite ci=none
	$(MAKE) -C $(DEMO_PROJECT) install UV="$(abspath $(UV))" PYTHON="$(PYTHON)"
	$(MAKE) -C $(DEMO_PROJECT) migrate UV="$(abspath $(UV))"
	cd $(DEMO_PROJECT) && $(abspath $(UV)) run --no-sync python manage.py demo_user
	$(MAKE) -C $(DEMO_PROJECT) dev UV="$(abspath $(UV))"

system-packages:  ## install the Debian packages the tests need (as root or with sudo)
	scripts/system-packages

test: system-packages $(VENV)/.installed  ## bake every option combination and test each project (ARGS="-k sqlite")
	$(VENV)/bin/pytest tests $(ARGS)

bench: system-packages $(VENV)/.installed  ## bake a project and measure the engine in it (ARGS="--quick"; docs/benchmarks.md)
	$(VENV)/bin/python -m benchmarks $(ARGS)

mutation: $(VENV)/.installed  ## mutation-test the engine in a baked project (ARGS="--database postgres"; docs/mutation-testing.md)
	$(VENV)/bin/python -m scripts.mutation $(ARGS)

lint: $(VENV)/.installed  ## lint the hooks, tests, scripts and benchmarks
	$(VENV)/bin/ruff check hooks tests scripts benchmarks
	$(VENV)/bin/ruff format --check hooks tests scripts benchmarks

clean:  ## remove the test environment and the demo project
	rm -rf $(VENV) .cache $(DEMO_DIR)
