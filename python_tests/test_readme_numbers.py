"""tools/check_readme_numbers.py: the numbers of the experiment READMEs come from the results files
they cite; a number that does not, or a citation of a missing file, is reported and fails."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKER = ROOT / "tools" / "check_readme_numbers.py"
if not CHECKER.is_file():
    pytest.skip("tools/ is not next to the tests", allow_module_level=True)
sys.path.insert(0, str(CHECKER.parent))
import check_readme_numbers  # noqa: E402

READMES = [ROOT / "experiments" / name / "README.md" for name in ("patterns", "omniglot", "images")]


@pytest.mark.parametrize("readme", READMES, ids=lambda path: path.parent.name)
def test_experiment_readme_numbers_come_from_their_files(readme):
    checked, problems = check_readme_numbers.check_file(readme)
    assert problems == []
    assert checked > 0, "the README cites no results file"


def test_every_tracked_markdown_file():
    run = subprocess.run([sys.executable, str(CHECKER)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


FRAGMENT = """\
Results ([results/evaluation.csv](results/evaluation.csv)):

<!-- numbers: results/evaluation.csv except: 2051 -->

| network | error | time |
|---|---|---|
| `plastic` (51 neurons) | 1.29% | 3.1 s |
| `rnn` | {rnn_error} (2051 neurons) | 1 min 53 s |

<!-- numbers: results/{log} -->
The plastic network ends at 1.2% in `--iterations 1000`.
"""
EVALUATION = "type,error_zeroed,seconds\nplastic,0.01288,3.11\nrnn,0.44476,113.4\nlog,0.0116,9\n"


def write_fragment(folder, rnn_error="44.5%", log="evaluation.csv"):
    (folder / "results").mkdir()
    (folder / "results" / "evaluation.csv").write_text(EVALUATION)
    readme = folder / "README.md"
    readme.write_text(FRAGMENT.format(rnn_error=rnn_error, log=log))
    return readme


def test_numbers_of_the_cited_file_pass(tmp_path):
    checked, problems = check_readme_numbers.check_file(write_fragment(tmp_path))
    assert (checked, problems) == (5, [])


def test_a_wrong_number_fails(tmp_path):
    readme = write_fragment(tmp_path, rnn_error="45.5%")
    checked, problems = check_readme_numbers.check_file(readme)
    assert len(problems) == 1
    assert f"{readme}:8: 45.5% is not in results/evaluation.csv" in problems[0]
    assert "nearest 44.476" in problems[0]
    run = subprocess.run(
        [sys.executable, str(CHECKER), str(readme)], capture_output=True, text=True
    )
    assert run.returncode == 1 and "45.5%" in run.stdout


def test_a_missing_file_fails(tmp_path):
    readme = write_fragment(tmp_path, log="missing.csv")
    assert check_readme_numbers.check_file(readme)[1] == [
        f"{readme}:10: cited file not found: results/missing.csv"
    ]
