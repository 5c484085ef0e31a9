# Entry points the README gives: `make test` (what CI runs) and `make demo`.
# Both install into a project-local virtualenv, .venv, created on first use.

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
PIP := $(VENV_PY) -m pip --disable-pip-version-check --quiet

.PHONY: test test-native demo bench venv clean native native-clean

test: $(VENV)/.installed-test
	scripts/check

demo: $(VENV)/.installed
	$(VENV)/bin/zdlb demo

bench: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" benchmarks/run.sh

venv: $(VENV_PY)

# Debian and Ubuntu split venv (and ensurepip) into the python3-venv package; without it
# `python3 -m venv` fails halfway, so remove the half-made .venv and say what to install.
$(VENV_PY):
	@$(PYTHON) -m venv $(VENV) || { \
		rm -rf $(VENV); \
		echo "error: '$(PYTHON) -m venv' failed. On Debian or Ubuntu run:" >&2; \
		echo "  sudo apt-get install python3-venv" >&2; \
		echo "then run make again." >&2; \
		exit 1; \
	}

# Editable installs: source edits need no reinstall, only a changed pyproject.toml does.
$(VENV)/.installed: pyproject.toml | $(VENV_PY)
	$(PIP) install -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV_PY)
	$(PIP) install -e '.[test]'
	@touch $@ $(VENV)/.installed

# Opt-in: the hot path compiled by mypyc (setup.py), in place (~20 s, gcc and Python
# headers needed). A compiled module is imported instead of its .py until `make native-clean`.
native: $(VENV)/.installed-test
	ZDLB_MYPYC=1 $(VENV_PY) setup.py --quiet build_ext --inplace

# The pure-Python default stays what `make test` checks; this runs the unit and network tests
# again with the hot path compiled, then removes the build.
test-native: native
	$(VENV_PY) -m pytest -q -p no:cacheprovider tests/unit tests/net; status=$$?; \
	$(MAKE) -s native-clean; exit $$status

native-clean:
	find zdlb -name '*.so' -delete
	rm -rf build

clean: native-clean
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
