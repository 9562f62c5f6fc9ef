#!/usr/bin/env bash
# Pin (or bump) the base images of docker/Dockerfile and docker/compose.yaml to their current digests.
#
#   docker/pin-digests.sh          # needs docker and access to the registries
#
# For each image tag below it pulls the tag, reads the digest the registry serves now, and rewrites every
# `TAG` or `TAG@sha256:<old>` in the two files to `TAG@sha256:<new>`. Review and commit the diff; re-run it
# to bump (security fixes in the base images). It never invents a digest: a tag it cannot resolve fails it.
set -euo pipefail
cd "$(dirname "$0")"
IMAGES=(
  "python:3.11-slim"
  "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
  "postgres:15"
)
for tag in "${IMAGES[@]}"; do
  docker pull --quiet "$tag" >/dev/null
  repo_digest=$(docker image inspect --format '{{index .RepoDigests 0}}' "$tag")  # name@sha256:...
  digest=${repo_digest#*@}
  [[ $digest == sha256:* ]] || { echo "no digest for $tag" >&2; exit 1; }
  pattern=$(printf '%s' "$tag" | sed 's/[.[\*^$/]/\\&/g')
  sed -i -E "s#${pattern}(@sha256:[0-9a-f]{64})?#${tag}@${digest}#g" Dockerfile compose.yaml
  echo "$tag -> $digest"
done
