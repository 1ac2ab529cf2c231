#!/usr/bin/env bash
# Installs the real servers and tools that parts of the test suite use (Debian packages).
# Run by .ci/run after the Python install; tests that need a missing one skip with a reason.
set -uo pipefail
[ "$(id -u)" = 0 ] || { echo "not root: skipping system packages"; exit 0; }

packages=()
# Each feature adds the Debian packages its tests need:
# (issue 3) Orthanc with its DICOMweb plugin; DCMTK as an independent renderer
packages+=(orthanc orthanc-dicomweb dcmtk)
# (issue 6) headless Chromium for the web page's end-to-end test
packages+=(chromium chromium-driver)
# PostgreSQL server for the metadata suites on the PostgreSQL back end
packages+=(postgresql)

missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
