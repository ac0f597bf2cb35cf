"""`snakemake --lint` has nothing to say about magma's own rules."""
from conftest import snakemake


def test_lint_is_clean(workdir):
    proc = snakemake(workdir, None, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Lints for" not in out, out
