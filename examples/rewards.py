"""An example reward plugin: called as f(prompt, completion, answer) -> float."""


def partial_credit(prompt: str, completion: str, answer: str) -> float:
    """1 for the exact answer, else the share of leading characters that match."""
    completion, answer = completion.strip(), answer.strip()
    if completion == answer:
        return 1.0
    same = 0
    for got, want in zip(completion, answer):
        if got != want:
            break
        same += 1
    return 0.5 * same / max(1, len(answer))
