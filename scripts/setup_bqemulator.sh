#!/usr/bin/env bash
# Create (idempotently) the BigQuery emulator's own virtualenv.
#
# Usage: PYTHON=python3.11 bash scripts/setup_bqemulator.sh VENV_DIR
#
# The emulator (PyPI bqemulator, DuckDB based) lives apart from the project's venv because its
# dependencies would move Beam's. At start it loads the DuckDB `spatial` and `avro` extensions
# and, if they are not installed, downloads them -- which fails offline and kills it. So the
# extensions come from their PyPI wheels and are installed into DuckDB's extension directory
# under VENV_DIR/home, the HOME the test fixture gives the emulator.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: PYTHON=python3.11 bash $0 VENV_DIR" >&2
    exit 2
fi

VENV_DIR=$1
PYTHON=${PYTHON:-python3.11}

# Exact pins: the extension wheels must match the DuckDB version byte for byte.
PACKAGES=(
    "bqemulator==1.4.0"
    "duckdb==1.5.5"
    "duckdb-extension-spatial==1.5.5"
    "duckdb-extension-avro==1.5.5"
    "numpy==2.4.6"
)

if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV_DIR"
fi
"$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip
"$VENV_DIR/bin/python" -m pip install --quiet "${PACKAGES[@]}"

mkdir -p "$VENV_DIR/home"
EMULATOR_HOME=$(cd "$VENV_DIR/home" && pwd)

# DuckDB resolves its extension directory from HOME; installing from a local file path never
# touches the network. INSTALL on an already installed extension is a no-op, so reruns are safe.
HOME="$EMULATOR_HOME" "$VENV_DIR/bin/python" - <<'PY'
import pathlib

import duckdb
import duckdb_extension_avro
import duckdb_extension_spatial

for package, name in ((duckdb_extension_spatial, "spatial"), (duckdb_extension_avro, "avro")):
    root = pathlib.Path(package.__file__).parent
    files = sorted(root.rglob(f"{name}.duckdb_extension"))
    if len(files) != 1:
        raise SystemExit(f"expected one {name}.duckdb_extension under {root}, found {files}")
    duckdb.execute(f"INSTALL '{files[0]}'")
    duckdb.execute(f"LOAD {name}")
    print(f"installed DuckDB extension {name} from {files[0]}")
PY

"$VENV_DIR/bin/bqemulator" --help >/dev/null
echo "BigQuery emulator ready in $VENV_DIR (HOME=$EMULATOR_HOME)"
