# Sourced by the scripts run on the lent GPU machine (torch there, no diffusers, no installed ditpass), from the
# repository root: the wheels in .whl/ (carried) go into /tmp/site; without an installed ditpass (its
# ditpass.passes is the top-level passes/), /tmp/ditpass_pkg gets a package of links to this checkout's ditpass/,
# passes/ and models/. Sets PY (the python to run, as an array) and PYTHONPATH.
PY=(python3)
if ! python3 -c 'import diffusers' 2>/dev/null; then
  SITE=${BENCH_SITE:-/tmp/site}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "warning: the wheels in .whl/ did not all install"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  python3 -c 'import diffusers' 2>/dev/null || { echo "diffusers missing (and no usable .whl/: carry it)"; exit 1; }
fi
if ! python3 -c 'import ditpass.passes, ditpass.models' 2>/dev/null; then
  PKG=/tmp/ditpass_pkg
  rm -rf "$PKG" && mkdir -p "$PKG/ditpass"
  ln -s "$PWD"/ditpass/* "$PKG/ditpass/" && ln -s "$PWD/passes" "$PKG/ditpass/passes" && ln -s "$PWD/models" "$PKG/ditpass/models"
  export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}
  PY=(python3 -P)  # not the checkout's ditpass/ from the current directory, which lacks ditpass.passes
fi
