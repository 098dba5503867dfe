# PMD pipeline tasks. The tools come from .venv (created by ./setup.sh).
set shell := ["bash", "-euo", "pipefail", "-c"]
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

# List the recipes
default:
    @just --list

# Build a small PMD from the embedded sample (or: just build-pmd --config my.toml --out /data/pmd)
build-pmd *ARGS:
    pmd build {{ARGS}}

# Pretrain FLAVA on built shards
pretrain *ARGS:
    pmd pretrain {{ARGS}}

# Shard statistics of a build folder
stats OUT="pmd_out" *ARGS:
    pmd stats {{OUT}} {{ARGS}}

# The default test run: offline, no GPU, under ~10 minutes (pytest exit 5 = no tests = failure)
test *ARGS:
    python -m pytest -m "not slow" --durations=40 {{ARGS}}

# Only the slow tests (kill-and-resume and the like); CI runs them after `just test`
test-slow *ARGS:
    python -m pytest -m "slow and not soak" --durations=40 {{ARGS}}

# The soak tests: random-moment kills, the int8 twin of the streaming check, kills CI covers another way (~15 minutes; not in CI)
test-soak *ARGS:
    python -m pytest -m soak {{ARGS}}

# Re-read every shard of a build: complete samples, counts and sha256 vs the manifest; writes sizes.json + wids index
verify OUT="pmd_out" *ARGS:
    pmd verify {{OUT}} {{ARGS}}

# Measure the issues' figures and print them (see BENCHMARKS.md)
bench *ARGS:
    python -m benchmarks {{ARGS}}

# Lint
lint:
    ruff check pmd_pipeline sources filters shards tests benchmarks
