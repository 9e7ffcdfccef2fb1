#!/usr/bin/env bash
# Build the skewless image (launcher + Beam worker) and one Dataflow Flex Template per job,
# then print the exact `gcloud dataflow flex-template run` command of each template.
#
#   PROJECT=my-proj REGION=us-central1 REPOSITORY=skewless BUCKET=my-bucket templates/build.sh [--dry-run] [JOB...]
#
# JOB: a template name (`python templates/render.py --list`: the jobs whose declaration has
# a template; default: all). --dry-run prints every command instead of running it (no
# Docker, no gcloud, no credentials needed). The metadata files are checked against the job
# declarations first (`python templates/render.py --check`).
# Needs: docker (or run the printed docker commands elsewhere), gcloud authenticated with
# roles/artifactregistry.writer on REPOSITORY and storage write on BUCKET. See docs/dataflow.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
# One pass over the job declarations: every metadata file checked against its rendering,
# then each template's name and kind ("streaming" or "batch").
"$PYTHON" "$ROOT/templates/render.py" --check || exit 1
declare -A KIND
ALL_JOBS=()
while read -r name kind; do ALL_JOBS+=("$name"); KIND[$name]=$kind; done \
  < <("$PYTHON" "$ROOT/templates/render.py" --list)
DRY_RUN=0
JOBS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "build.sh: unknown option '$arg'" >&2; exit 2 ;;
    *)
      if [[ " ${ALL_JOBS[*]} " == *" $arg "* ]]; then JOBS+=("$arg")
      else echo "build.sh: unknown template '$arg' (templates: ${ALL_JOBS[*]})" >&2; exit 2; fi ;;
  esac
done
[ ${#JOBS[@]} -gt 0 ] || JOBS=("${ALL_JOBS[@]}")

: "${PROJECT:?set PROJECT (the Google Cloud project id)}"
: "${REGION:?set REGION (e.g. us-central1)}"
: "${BUCKET:?set BUCKET (a bucket name, without gs://)}"
REPOSITORY="${REPOSITORY:-skewless}"
TAG="${TAG:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || date +%Y%m%d-%H%M%S)}"
REGISTRY="$REGION-docker.pkg.dev/$PROJECT/$REPOSITORY"

run() {
  # Print the command shell-quoted; run it unless --dry-run.
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "$DRY_RUN" = 1 ] || "$@"
}

streaming() { [ "${KIND[$1]}" = streaming ]; }

# Fail before any build if a metadata file does not parse strictly (unknown fields rejected).
"$PYTHON" - "$ROOT" "${JOBS[@]}" <<'PY' || { echo "build.sh: metadata check failed (pip install google-cloud-dataflow-client?)" >&2; exit 1; }
import pathlib, sys
from google.cloud.dataflow_v1beta3 import TemplateMetadata
root = pathlib.Path(sys.argv[1])
for job in sys.argv[2:]:
    TemplateMetadata.from_json((root / "templates" / job / "metadata.json").read_text())
PY

for job in "${JOBS[@]}"; do
  image="$REGISTRY/skewless-${job//_/-}:$TAG"
  spec="gs://$BUCKET/templates/skewless-${job//_/-}-$TAG.json"
  echo "== $job"
  run docker build -f "$ROOT/templates/Dockerfile" --build-arg "TEMPLATE=$job" -t "$image" "$ROOT"
  run docker push "$image"
  extra=()
  if streaming "$job"; then extra+=(--enable-streaming-engine); fi
  run gcloud dataflow flex-template build "$spec" \
    --image "$image" \
    --sdk-language PYTHON \
    --metadata-file "$ROOT/templates/$job/metadata.json" \
    --project "$PROJECT" \
    "${extra[@]}"
done

echo
echo "== launch commands (fill in the VALUEs; docs/dataflow.md explains each one)"
for job in "${JOBS[@]}"; do
  image="$REGISTRY/skewless-${job//_/-}:$TAG"
  spec="gs://$BUCKET/templates/skewless-${job//_/-}-$TAG.json"
  echo
  echo "# $job"
  {
    printf 'gcloud dataflow flex-template run "skewless-%s-$(date +%%Y%%m%%d-%%H%%M%%S)" \\\n' "${job//_/-}"
    printf '  --project %s --region %s \\\n' "$PROJECT" "$REGION"
    printf '  --template-file-gcs-location %s \\\n' "$spec"
    printf '  --service-account-email skewless-%s@%s.iam.gserviceaccount.com \\\n' "${job//_/-}" "$PROJECT"
    printf '  --staging-location gs://%s/staging --temp-location gs://%s/tmp \\\n' "$BUCKET" "$BUCKET"
    if streaming "$job"; then printf '  --enable-streaming-engine --max-workers 3 \\\n'; fi
    printf '  --parameters sdk_container_image=%s' "$image"
    # One --parameters line per required template parameter (from the metadata itself).
    "$PYTHON" - "$ROOT/templates/$job/metadata.json" <<'PY'
import json, sys
for p in json.load(open(sys.argv[1]))["parameters"]:
    if not p.get("isOptional"):
        print(f" \\\n  --parameters {p['name']}=VALUE", end="")
print()
PY
  }
  if streaming "$job"; then
    echo "# update the running $job job in place (same job name, same step names):"
    printf '#   gcloud dataflow flex-template run RUNNING_JOB_NAME --update [the flags above]\n'
  fi
done
