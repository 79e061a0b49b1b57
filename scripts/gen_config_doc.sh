#!/usr/bin/env bash
# Rewrites docs/CONFIG.md from the knob table in src/config.rs (the test that compares the two
# writes the page when REGENERATE_CONFIG_DOC is set).
set -euo pipefail
cd "$(dirname "$0")/.."
REGENERATE_CONFIG_DOC=1 cargo test --lib --quiet config::tests::reference_page_is_the_table_rendered
echo "wrote docs/CONFIG.md ($(wc -c < docs/CONFIG.md) bytes)"
