"""Views of a finished build: `pmd stats` (tables, JSON, plots), `pmd show` and `pmd verify` (re-reads every tar)."""
