"""Secrets never reach a terminal or a log: env listings and command lines are masked."""

from __future__ import annotations

import pytest

from vllm_fleet.masking import MASK, is_secret_name, mask_argv, mask_env, mask_text, mask_value


@pytest.mark.parametrize(
    "name",
    [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "hf_token",
        "OPENAI_API_KEY",
        "APIKEY",
        "VLLM_API_KEYS",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "DB_PASSWORD",
        "SMTP_PASSWD",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "BASIC_AUTH",
        "HF_TOKEN_PATH",
    ],
)
def test_secret_names_are_recognised(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "CUDA_VISIBLE_DEVICES",
        "TOKENIZERS_PARALLELISM",  # common in vLLM setups; its value is true/false
        "HF_HUB_OFFLINE",
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_SKIP_MODEL_NAME_VALIDATION",
        "AUTHOR",
        "KEYBOARD_LAYOUT",
        "OMP_NUM_THREADS",
    ],
)
def test_ordinary_names_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


def test_env_masks_secret_values_and_shows_the_rest() -> None:
    env = {
        "HF_TOKEN": "hf_abcdefghijklmnop",
        "OPENAI_API_KEY": "sk-123",
        "EMPTY_TOKEN": "",
        "CUDA_VISIBLE_DEVICES": "1,2",
        "TOKENIZERS_PARALLELISM": "false",
    }
    assert mask_env(env) == {
        "HF_TOKEN": MASK,
        "OPENAI_API_KEY": MASK,
        "EMPTY_TOKEN": "",  # unset-looking stays visibly empty
        "CUDA_VISIBLE_DEVICES": "1,2",
        "TOKENIZERS_PARALLELISM": "false",
    }
    assert env["HF_TOKEN"] == "hf_abcdefghijklmnop"  # the input is left alone


def test_mask_value_reveals_nothing_of_the_value() -> None:
    assert mask_value("hf_abc") == mask_value("x" * 100) == MASK == "****"
    assert mask_value("") == ""


def test_argv_masks_secret_flag_values_in_both_spellings() -> None:
    argv = [
        "vllm", "serve", "org/m", "--api-key", "sk-one", "--port", "8100",
        "--hf-token=hf_two", "--ssl-keyfile-password", "pw3", "--enforce-eager",
    ]  # fmt: skip
    masked = mask_argv(argv)
    assert masked == [
        "vllm", "serve", "org/m", "--api-key", MASK, "--port", "8100",
        f"--hf-token={MASK}", "--ssl-keyfile-password", MASK, "--enforce-eager",
    ]  # fmt: skip
    assert not {"sk-one", "hf_two", "pw3"} & set(" ".join(masked).replace("=", " ").split())


def test_argv_masks_underscore_spellings_vllm_accepts() -> None:
    assert mask_argv(["--api_key", "sk-one", "--hf_token=hf_two"]) == [
        "--api_key",
        MASK,
        f"--hf_token={MASK}",
    ]


def test_argv_masks_secret_env_assignments_in_a_command() -> None:
    argv = ["env", "HF_TOKEN=hf_abc", "TOKENIZERS_PARALLELISM=false", "vllm", "serve", "m"]
    assert mask_argv(argv) == [
        "env", f"HF_TOKEN={MASK}", "TOKENIZERS_PARALLELISM=false", "vllm", "serve", "m",
    ]  # fmt: skip


def test_argv_without_secrets_is_unchanged() -> None:
    argv = [
        "vllm", "serve", "m", "--max-model-len", "4096", "--chat-template-kwargs",
        '{"KEY": 1}', "--api-keys-file-is-not-a-flag", "--kv-transfer-config={}",
    ]  # fmt: skip
    assert mask_argv(argv) == argv


def test_secret_flag_at_the_end_with_no_value_is_kept() -> None:
    assert mask_argv(["vllm", "serve", "--api-key"]) == ["vllm", "serve", "--api-key"]


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (
            "INFO non-default args: {'model': 'm', 'api_key': ['sk-abc123'], 'port': 8000}",
            "INFO non-default args: {'model': 'm', 'api_key': ['****'], 'port': 8000}",
        ),
        (
            "HF_TOKEN=hf_xyz --api-key sk-9 --hf-token=hf_q",
            "HF_TOKEN=**** --api-key **** --hf-token=****",
        ),
        ('{"api_key": "sk-1", "n": 2}', '{"api_key": "****", "n": 2}'),
        ("OPENAI_API_KEY: sk-z", "OPENAI_API_KEY: ****"),
    ],
)
def test_secrets_in_a_log_line_are_masked(line: str, shown: str) -> None:
    assert mask_text(line) == shown


@pytest.mark.parametrize(
    "line",
    ["TOKENIZERS_PARALLELISM=false", "max_num_batched_tokens=2048", "Loading weights: 100%"],
)
def test_log_lines_without_secrets_are_shown_as_they_are(line: str) -> None:
    assert mask_text(line) == line
