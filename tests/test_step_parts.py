"""benchmarks/step_parts.py: its FLOP counts against hand counts, and the report section it splices."""

from benchmarks import step_parts


def test_conv_and_dense_flops_by_hand():
    # 3x3 conv, 2 x 4x4 outputs, 3 -> 5 channels: each output is 3*3*3 multiply-adds.
    assert step_parts.conv_flops(2, 4, 4, 3, 3, 3, 5) == 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3)
    # Grouped: each output sees c_in / groups channels.
    assert step_parts.conv_flops(1, 1, 1, 1, 1, 8, 8, groups=4) == 2 * 8 * 2
    assert step_parts.dense_flops(128, 64, 10) == 2 * 128 * 64 * 10
    assert step_parts.matmul_flops(2048, 2048, 2048) == 2 * 2048**3


def test_fa_flops_by_hand():
    b, n, c = 2, 49, 16
    # Gram: M^T M, P^T P, M^T P (C x N by N x C) forward; four N x C by C x C backward.
    gram = b * (3 * 2 * c * n * c + 4 * 2 * n * c * c + 40 * n * c)
    assert step_parts.gram_fa_flops(b, n, c) == gram == step_parts.fa_flops("gram", b, n, c)
    # Pairwise: Z = M P^T (N x C by C x N), then G A and G B (N x N by N x C).
    pairwise = b * (2 * n * c * n + 2 * 2 * n * n * c + 7 * n * n + 40 * n * c)
    assert step_parts.pairwise_fa_flops(b, n, c) == pairwise
    assert step_parts.fa_flops("pairwise", b, n, c) == pairwise
    # The loss alone is less than loss + gradient.
    for method in ("gram", "pairwise"):
        assert step_parts.fa_forward_flops(method, b, n, c) < step_parts.fa_flops(method, b, n, c)


def test_write_section_replaces_its_own_section(tmp_path):
    path = tmp_path / "step_cost.md"
    path.write_text("# before\n\nissue 22's table\n")
    section = f"{step_parts.MARK_BEGIN}\nfirst\n{step_parts.MARK_END}\n"
    step_parts.write_section(str(path), section)
    assert path.read_text().startswith("# before\n\nissue 22's table\n")
    step_parts.write_section(str(path), section.replace("first", "second"))
    text = path.read_text()
    assert "second" in text and "first" not in text and text.count(step_parts.MARK_BEGIN) == 1
    assert "issue 22's table" in text
