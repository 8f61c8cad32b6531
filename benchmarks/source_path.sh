# Sourced by the device scripts: makes `import distil` work from this clone without installing it.
# distil's import root has no folder of its own (pyproject.toml maps common/, pretrain/, ... under it), so a
# temporary folder gets a `distil/` of symlinks to the clone's folders, and goes first on PYTHONPATH.
# Symlinks, not copies: the code run is the working tree's as it is now.
distil_src="${TMPDIR:-/tmp}/distil_src_$$"
rm -rf "$distil_src" && mkdir -p "$distil_src/distil"
for part in common pretrain kernels data_pipeline configs ds_configs launch; do
  ln -s "$PWD/$part" "$distil_src/distil/$part"
done
export PYTHONPATH="$distil_src${PYTHONPATH:+:$PYTHONPATH}"
# Python must not put the clone's root first on its path (`python -m` does): its kernels/ folder would
# shadow the installed `kernels` package. Safe-path mode, inherited by every process started below.
export PYTHONSAFEPATH=1
