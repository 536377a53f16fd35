"""grokfast.kernels resolves in every kind of install: the package_dir mapping (wheel, modern editable) or,
for a legacy `setup.py develop` install that ignores the mapping, the fallback finder in grokfast/__init__.py."""
import os
import subprocess
import sys

import grokfast


def test_fallback_finder_maps_the_checkouts_kernels_folder():
    finder = next(f for f in sys.meta_path if type(f).__name__ == "_KernelsBesideThePackage")
    assert sys.meta_path[-1] is finder or sys.meta_path.index(finder) > 0    # never ahead of the real finders
    spec = finder.find_spec("grokfast.kernels")
    root = os.path.dirname(os.path.dirname(os.path.abspath(grokfast.__file__)))
    assert spec.origin == os.path.join(root, "kernels", "__init__.py")
    assert list(spec.submodule_search_locations) == [os.path.join(root, "kernels")]
    assert finder.find_spec("grokfast.nothing") is None and finder.find_spec("kernels") is None


def test_kernels_import_with_only_the_checkout_on_the_path(tmp_path):
    """What a legacy editable install gives: the checkout on sys.path and no mapping (a fresh interpreter
    with site-packages' editable finders left out via -S, and the checkout as PYTHONPATH)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(grokfast.__file__)))
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + site))
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]; "
            "import grokfast.kernels.layout as l; print(l.__file__)")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.join(root, "kernels", "layout.py")
