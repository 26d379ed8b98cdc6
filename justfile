# Recipes for developers; CI calls the same commands through .ci/run.
venv := ".venv/bin"

setup:
    python3 -m venv .venv
    {{venv}}/python -m pip install --quiet --upgrade pip
    {{venv}}/python -m pip install --quiet -e '.[dev]'

serve *ARGS: setup
    {{venv}}/trio-cloudhub serve --data-dir ./cloudhub-data {{ARGS}}

test *ARGS:
    {{venv}}/pytest {{ARGS}}

lint:
    {{venv}}/ruff check trio_cloudhub tests bench
    {{venv}}/mypy

bench COUNT="1000":
    {{venv}}/python -m bench.run --edges {{COUNT}}
