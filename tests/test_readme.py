"""The README documents every registered method with each of its parameters."""

from __future__ import annotations

from pathlib import Path

from merging_core import list_methods

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_method_and_parameter_is_documented() -> None:
    rows = {line.split("|")[1].strip(" `"): line for line in README.splitlines()
            if line.startswith("| `")}
    for method in list_methods():
        assert method.name in rows, f"README lacks a row for {method.name}"
        for param in method.params:
            assert f"`{param.name}`" in rows[method.name], f"{method.name}.{param.name} undocumented"
            if not param.required:
                default = (str(param.default).lower() if isinstance(param.default, bool)
                           else param.default if isinstance(param.default, str) else f"{param.default:g}")
                assert f"({default}" in rows[method.name], f"{method.name}.{param.name} default"


def test_readme_results_tables_are_the_benchmarks_output() -> None:
    """Every table under bench/results/ that the README shows is copied verbatim."""
    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    for name in ("demo_results.md", "merge_bench_cpu.md", "api_bench_cpu.md", "bo_bench_cpu.md",
                 "adamerging_bench_cpu.md", "sweep_bench_cpu.md", "label_scoring_bench_cpu.md",
                 "causal_results.md", "speech_results.md"):
        tables = [block for block in "\n".join(
            line if line.startswith("|") else "" for line in (results / name).read_text().splitlines()
        ).split("\n\n") if block.strip()]
        assert tables, name
        for table in tables:
            assert table.strip("\n") in README, f"README's copy of bench/results/{name} is stale"


def test_route_table_is_the_openapi_document(tiny_workspace: Path, tmp_path: Path) -> None:
    """The README's route table lists exactly the operations /openapi.json documents."""
    import re

    from app.main import create_app
    from app.settings import Settings

    section = README[README.index("## The service"):]
    table = section[section.index("| route |"):].split("\n\n")[0]
    listed = {(method, path) for row in table.splitlines()[2:]
              for method, path in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`]*)`", row.split("|")[1])}
    document = create_app(Settings(workspace=tiny_workspace, artifacts_dir=tmp_path)).openapi()
    served = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert listed == served, f"README lacks {sorted(served - listed)}; README has {sorted(listed - served)}"
