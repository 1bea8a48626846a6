"""server/engine/constrain.py: the loop detector that turns the closing rule on early."""
import pytest

from server.engine.constrain import LOOP_MIN_TOKENS, looping


@pytest.mark.parametrize("unit, copies, want", [
    ([7], LOOP_MIN_TOKENS, True),                 # one token over and over
    ([7], LOOP_MIN_TOKENS - 1, False),
    ([1, 2, 3, 4, 5, 6], 4, True),                # a key/value pair, 4 times back to back
    ([1, 2, 3, 4, 5, 6], 3, False),
    ([1, 2], 12, True),
    ([1, 2], 11, False),                          # 22 tokens: under the span a loop needs
    (list(range(48)), 4, True),
    (list(range(49)), 4, False),                  # a unit longer than LOOP_MAX_PERIOD
])
def test_looping_needs_enough_back_to_back_copies(unit, copies, want):
    assert looping([99, 98] + unit * copies) is want


def test_varied_output_is_not_a_loop():
    text = [(i * 7919) % 1000 for i in range(500)]
    assert not looping(text) and not looping([]) and not looping([5])
    assert not looping([1, 2, 3, 4] * 3 + [9])    # copies that do not end the output
