"""Recipe schema, YAML 1.2-style loading, overrides and their error messages (asserted word for word)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pydantic
import pytest

from sslt_cli.catalog import builtin_recipes
from sslt_cli.config import (
    Recipe,
    closest_key,
    dump_yaml,
    load_recipe,
    parse_override,
    parse_yaml,
    recipe_dict,
    validate_tree,
)
from sslt_cli.errors import RecipeError

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO_ROOT / "recipes").glob("**/*.yaml")
                 if "ablations" not in p.relative_to(REPO_ROOT / "recipes").parts)
ABLATIONS = sorted((REPO_ROOT / "recipes" / "ablations").glob("**/*.yaml"))

PRESETS = ("'ssltie', 'lvs', 'ezvsl', 'fnac', 'sspl', 'slavc', 'fnac_bicubic', 'slavc_rel', 'slavc_abs', 'align', "
           "'align_lvs' or 'align_lvs_bilinear'")


# a recipe of one key at its default: the base the override tests change (an empty mapping is refused)
BASE = "name: run\n"


def write_recipe(text: str, name: str = "recipe.yaml") -> str:
    """Write a recipe into the test's working folder and return its relative path (the name messages show)."""
    Path(name).write_text(text)
    return name


def recipe_error(path: str, overrides: list[str] | None = None) -> str:
    """The rendered RecipeError that loading ``path`` with ``overrides`` raises."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.render()


# --- defaults -------------------------------------------------------------------------------------------------------

def test_defaults_are_the_papers_settings() -> None:
    recipe = Recipe()
    assert (recipe.optim.batch_size, recipe.optim.lr, recipe.optim.weight_decay) == (32, 1e-4, 1e-4)
    assert (recipe.optim.epochs, recipe.seed) == (100, 4)
    assert (recipe.loss.eps_pos, recipe.loss.eps_neg) == (0.65, 0.40)
    assert (recipe.loss.tau, recipe.loss.temperature) == (0.03, 0.07)
    assert (recipe.audio.n_fft, recipe.audio.hop_length, recipe.audio.n_mels) == (512, 239, 257)
    assert (recipe.loss.cl_weight, recipe.loss.geo_weight) == (0.5, 1.0)


def test_an_empty_file_or_mapping_is_refused_and_one_key_gives_the_other_defaults() -> None:
    for text in ("", "# nothing yet\n\n", "{}\n"):
        with pytest.raises(RecipeError, match="the recipe is empty"):
            load_recipe(write_recipe(text))
    assert load_recipe(write_recipe(f"name: {Recipe().name}\n")) == Recipe()


def test_recipes_are_frozen() -> None:
    recipe = Recipe()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        recipe.optim.lr = 3e-4  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        recipe.seed = 0  # type: ignore[misc]
    assert recipe.optim.lr == 1e-4


# --- YAML quirks ----------------------------------------------------------------------------------------------------

def test_scientific_notation_is_a_float() -> None:
    # PyYAML's YAML 1.1 resolver reads 2e-5 as the string '2e-5'.
    assert parse_yaml("lr: 2e-5\nbig: 1e4\nneg: -1E-3\nint: 10") == {"lr": 2e-5, "big": 1e4, "neg": -1e-3, "int": 10}
    recipe = load_recipe(write_recipe("optim:\n  lr: 2e-5\n  weight_decay: 5e-4\n"))
    assert recipe.optim.lr == 2e-5 and isinstance(recipe.optim.lr, float)
    assert recipe.optim.weight_decay == 5e-4


@pytest.mark.parametrize(("word", "value"), [("off", False), ("no", False), ("on", True), ("yes", True),
                                             ("false", False), ("True", True)])
def test_yaml11_booleans_reach_bool_fields(word: str, value: bool) -> None:
    recipe = load_recipe(write_recipe(f"data:\n  cache_spectrograms: {word}\n"))
    assert recipe.data.cache_spectrograms is value


def test_string_fields_keep_yes_and_no_as_text() -> None:
    recipe = load_recipe(write_recipe("name: 'no'\ndata:\n  root: no\n  train: off\ntracking:\n  experiment: yes\n"))
    assert (recipe.data.root, recipe.data.train, recipe.tracking.experiment) == ("no", "off", "yes")
    assert parse_yaml("a: no\nb: on") == {"a": "no", "b": "on"}


def test_unsafe_tags_are_rejected() -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_yaml("x: !!python/object/apply:os.system ['true']")


@pytest.mark.parametrize(("text", "value"), [("012", 12), ("1:20", "1:20"), ("2024-05-01", "2024-05-01"),
                                             ("0o17", 15), ("0x1F", 31), ("1_000", "1_000"), ("-7", -7),
                                             (".5", 0.5), ("1.", 1.0), (".inf", math.inf)])
def test_yaml12_scalars(text: str, value: object) -> None:
    # YAML 1.2 core: no octal by leading zero, no base-60 ints, no implicit timestamps, no digit separators.
    assert parse_yaml(f"x: {text}") == {"x": value}


def test_dump_then_parse_keeps_strings_that_look_like_other_types() -> None:
    tree = {"name": "2e-5", "data": {"root": "1e3", "train": "off", "val": "null", "test": {"0o7": " padded "}}}
    assert parse_yaml(dump_yaml(tree)) == tree


@pytest.mark.parametrize(("override", "fields"), [("name=2024", ("2024", "sslt")),
                                                  ("tracking.experiment=2024", (Recipe().name, "2024"))])
def test_string_field_takes_a_number_as_text(override: str, fields: tuple[str, str]) -> None:
    recipe = load_recipe(write_recipe(BASE), [override])
    assert (recipe.name, recipe.tracking.experiment) == fields


# --- overrides ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "key", "value"), [
    ("optim.lr=3e-4", "optim.lr", 3e-4),
    ("optim.batch_size=64", "optim.batch_size", 64),
    ("data.test={vggss: a}", "data.test", {"vggss": "a"}),
    ("transforms.equivariance.scales=[1.0,0.5]", "transforms.equivariance.scales", [1.0, 0.5]),
    ("data.val=null", "data.val", None),
    ("data.root=/data/vggsound", "data.root", "/data/vggsound"),
    (" optim.lr = 3e-4", "optim.lr", 3e-4),
])
def test_parse_override(text: str, key: str, value: object) -> None:
    assert parse_override(text) == (key, value)


def test_overrides_are_typed_by_the_schema() -> None:
    path = write_recipe("name: t\n")
    recipe = load_recipe(path, ["optim.lr=3e-4", "data.test={vggss: a}", "transforms.equivariance.scales=[1.0,0.5]",
                                "optim.epochs=3", "data.cache_spectrograms=off", "data.root=no"])
    assert recipe.optim.lr == 3e-4 and isinstance(recipe.optim.lr, float)
    assert recipe.data.test == {"vggss": "a"}  # the mapping replaces the default one
    assert recipe.transforms.equivariance.scales == (1.0, 0.5)
    assert recipe.optim.epochs == 3 and isinstance(recipe.optim.epochs, int)
    assert recipe.data.cache_spectrograms is False
    assert recipe.data.root == "no"


def test_precedence_defaults_then_recipe_then_overrides() -> None:
    path = write_recipe("optim:\n  lr: 2e-5\n  epochs: 3\ndata:\n  root: from_file\n")
    recipe = load_recipe(path, ["optim.lr=3e-4", "data.root=first", "data.root=second"])
    assert recipe.optim.lr == 3e-4          # override beats the file
    assert recipe.optim.epochs == 3         # the file beats the default
    assert recipe.optim.batch_size == 32    # default where nobody spoke
    assert recipe.data.root == "second"     # the last override wins
    assert load_recipe(path).optim.lr == 2e-5


def test_the_resolved_recipe_round_trips_through_yaml() -> None:
    recipe = load_recipe(write_recipe("name: t\n"), ["optim.lr=2e-5", "data.holdout_classes=[dog, cat]"])
    assert validate_tree(parse_yaml(dump_yaml(recipe_dict(recipe))), "again") == recipe


# --- error messages -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "overrides", "problem"), [
    ("optim:\n  lrr: 1e-4\n", [], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("zzzz: 1\n", [], "unknown key 'zzzz'"),
    ("name: t\n", ["optim.lrr=3e-4"],
     "unknown key 'optim.lrr' (did you mean 'optim.lr'?) (from override 'optim.lrr=3e-4')"),
    ("optim:\n  batch_size: abc\n", [], "key 'optim.batch_size': expected an integer, got 'abc'"),
    (BASE, ["optim.lr=abc"], "key 'optim.lr': expected a number, got 'abc' (from override 'optim.lr=abc')"),
    ("eval:\n  protocol: foo\n", [],
     f"key 'eval.protocol': expected {PRESETS}, got 'foo'"),
    (BASE, ["optim.lr=-1"], "key 'optim.lr': input should be greater than 0, got -1 (from override 'optim.lr=-1')"),
], ids=["unknown_key", "unknown_key_no_match", "unknown_override_key", "wrong_type", "wrong_type_override",
        "bad_literal", "out_of_range"])
def test_one_problem_is_named_with_the_file_and_key(text: str, overrides: list[str], problem: str) -> None:
    assert recipe_error(write_recipe(text), overrides) == (
        f"recipe.yaml: 1 problem(s) in the recipe\n  - recipe.yaml: {problem}")


def test_all_problems_are_reported_together() -> None:
    path = write_recipe("optim:\n  lrr: 1e-4\n  batch_size: abc\neval:\n  protocol: foo\n")
    assert recipe_error(path, ["bad", "seed=1.5"]) == (
        "recipe.yaml: 5 problem(s) in the recipe\n"
        "  - override 'bad' is not of the form key=value: write overrides as dotted.key=value, "
        "e.g. optim.lr=3e-4 data.root=/data/vggsound\n"
        "  - recipe.yaml: key 'seed': expected an integer, got 1.5 (from override 'seed=1.5')\n"
        "  - recipe.yaml: key 'optim.batch_size': expected an integer, got 'abc'\n"
        "  - recipe.yaml: unknown key 'optim.lrr' (did you mean 'optim.lr'?)\n"
        f"  - recipe.yaml: key 'eval.protocol': expected {PRESETS}, got 'foo'")


def test_malformed_override() -> None:
    assert recipe_error(write_recipe(BASE), ["bad"]) == (
        "recipe.yaml: 1 problem(s) in the recipe\n"
        "  - override 'bad' is not of the form key=value: write overrides as dotted.key=value, "
        "e.g. optim.lr=3e-4 data.root=/data/vggsound")
    with pytest.raises(RecipeError) as info:
        parse_override("1x=3")
    assert info.value.render() == "override '1x=3': '1x' is not a dotted key such as optim.lr"


def test_yaml_syntax_error() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe("name: [a\noptim:\n  lr: 1\n"))
    assert info.value.render() == ("recipe.yaml: not valid YAML\n"
                                   "  - line 1, column 7: while parsing a flow sequence; "
                                   "line 2, column 6: expected ',' or ']', but got ':'")


def test_missing_file_folder_and_non_mapping() -> None:
    assert recipe_error("missing.yaml") == (
        "missing.yaml: recipe file not found\n"
        f"  - give a path, or the name of one shipped with sslt: {', '.join(builtin_recipes())}")
    Path("folder").mkdir()
    assert recipe_error("folder") == "folder: is a folder, expected a recipe .yaml file"
    assert recipe_error(write_recipe("- a\n- b\n")) == "recipe.yaml: a recipe must be a mapping of keys, got list"


@pytest.mark.parametrize("override", ["transforms.equivariance.scales=[a]", "optimm.lr=3", "optim.lr.x=3",
                                      "audio.n_mels=300"])
def test_every_problem_caused_by_an_override_says_so(override: str) -> None:
    assert f"(from override '{override}')" in recipe_error(write_recipe(BASE), [override])


@pytest.mark.parametrize(("bad", "closest"), [("optim.lrr", "optim.lr"), ("optimm", "optim"), ("lr", "optim.lr"),
                                              ("transforms.equivariance.scale", "transforms.equivariance.scales"),
                                              ("data.cache_spectrogram", "data.cache_spectrograms"), ("zzzz", None)])
def test_closest_key(bad: str, closest: str | None) -> None:
    assert closest_key(bad) == closest


# --- shipped recipes ------------------------------------------------------------------------------------------------

def test_at_least_one_recipe_ships() -> None:
    assert RECIPES, f"no recipe under {REPO_ROOT / 'recipes'}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO_ROOT / "recipes")))
def test_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert re.fullmatch(r"[\w.\-]+", recipe.name)


@pytest.mark.parametrize("path", RECIPES + ABLATIONS, ids=lambda p: str(p.relative_to(REPO_ROOT / "recipes")))
def test_shipped_recipe_starts_with_a_three_line_comment(path: Path) -> None:
    head = path.read_text().splitlines()[:3]
    assert len(head) == 3 and all(re.match(r"#\s*\S", line) for line in head), (
        f"{path}: the first 3 lines must be comments: what it is for, which paper row/table, time on CPU and one GPU")
    assert re.search(r"paper|table|row", head[1], re.IGNORECASE), f"{path}: line 2 names no paper row or table"
    assert re.search(r"\bCPU\b", head[2]), f"{path}: line 3 gives no CPU time"
    assert re.search(r"GPU|H100|H200|A100|V100|L4|T4", head[2]), f"{path}: line 3 gives no GPU time"


# --- objectives: one section each ---------------------------------------------------------------------------------

def test_a_key_of_another_objective_is_an_error_that_names_its_objective() -> None:
    path = write_recipe("loss:\n  objective: ezvsl\n  eps_pos: 0.6\n  temperature: 0.03\n")
    assert recipe_error(path) == (
        "recipe.yaml: 1 problem(s) in the recipe\n"
        "  - recipe.yaml: key 'loss.eps_pos': eps_pos belongs to objective 'tie', and this loss section's objective "
        "is 'ezvsl' (remove the key, or set loss.objective=tie)")
    # the same key under its own objective, and the shared keys under both
    assert load_recipe(write_recipe("loss: {eps_pos: 0.6, geo_weight: 0.5}\n")).loss.eps_pos == 0.6
    ezvsl = load_recipe(write_recipe("loss: {objective: ezvsl, temperature: 0.03, cl_weight: 1.0}\n")).loss
    assert (ezvsl.objective, ezvsl.temperature, ezvsl.cl_weight, ezvsl.parameters()) == (
        "ezvsl", 0.03, 1.0, {"temperature": 0.03})


def test_an_unknown_objective_and_a_misspelt_loss_key_are_clear_errors() -> None:
    assert recipe_error(write_recipe(BASE), ["loss.objective=lvs"]) == (
        "recipe.yaml: 1 problem(s) in the recipe\n"
        "  - recipe.yaml: key 'loss.objective': expected one of 'tie', 'ezvsl', got 'lvs' (from override "
        "'loss.objective=lvs')")
    assert recipe_error(write_recipe("loss: {objective: ezvsl, temprature: 0.03}\n")) == (
        "recipe.yaml: 1 problem(s) in the recipe\n"
        "  - recipe.yaml: unknown key 'loss.temprature' (did you mean 'loss.temperature'?)")


FLAT_EZVSL_LOSS = {"objective": "ezvsl", "eps_pos": 0.65, "eps_neg": 0.4, "tau": 0.03, "temperature": 0.03,
                   "cl_weight": 0.5, "geo_weight": 1.0, "negatives": "global"}


def test_a_recipe_saved_with_the_flat_loss_section_reads_in_its_objectives_section() -> None:
    from sslt_cli.config import EzvslLoss, load_saved_recipe, migrate_saved_recipe

    saved = {"name": "old", "loss": dict(FLAT_EZVSL_LOSS)}
    assert load_saved_recipe(saved, "config.yaml").loss == EzvslLoss(temperature=0.03)
    assert saved["loss"] == FLAT_EZVSL_LOSS  # the tree read is not changed
    tie = {"loss": {**FLAT_EZVSL_LOSS, "objective": "tie"}}
    assert migrate_saved_recipe(tie, "config.yaml") == tie  # a tie run's flat section is its section
    # a key of another objective that is not at its old default said something the run did not do: refused
    with pytest.raises(RecipeError) as info:
        load_saved_recipe({"loss": {**FLAT_EZVSL_LOSS, "eps_pos": 0.7, "tau": 0.05}}, "runs/old/config.yaml")
    assert info.value.render() == (
        "runs/old/config.yaml: the saved recipe's loss section sets eps_pos=0.7, tau=0.05, which belong(s) to another "
        "objective than its own ('ezvsl'): the sslt that saved it ignored them\n"
        "  - remove loss.eps_pos from runs/old/config.yaml (the run was trained without it) to evaluate, resume or "
        "report it\n"
        "  - remove loss.tau from runs/old/config.yaml (the run was trained without it) to evaluate, resume or "
        "report it")
    with pytest.raises(RecipeError) as info:  # a recipe written today gets no such leniency
        validate_tree({"loss": dict(FLAT_EZVSL_LOSS)}, "recipe")
    assert [problem.split(":")[1] for problem in info.value.problems] == [" key 'loss.eps_pos'", " key 'loss.eps_neg'",
                                                                          " key 'loss.tau'"]
