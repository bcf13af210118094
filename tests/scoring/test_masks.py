import pytest
import torch
import torch.nn.functional as F

from workbench.scoring.masks import IGNORE, next_token_mask, pad_rows, scored_positions, shifted_labels

LABELS = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE],
                       [IGNORE, 7, 8, 9, 10]])


def test_shifted_labels_pair_each_position_with_the_token_it_predicts():
    assert shifted_labels(LABELS).tolist() == [[IGNORE, 5, 6, IGNORE, IGNORE], [7, 8, 9, 10, IGNORE]]


def test_next_token_mask_is_the_shifted_label_mask_and_matches_the_list_form():
    mask = next_token_mask(LABELS)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    for row, labels in zip(mask, LABELS.tolist()):
        assert row.nonzero().squeeze(1).tolist() == scored_positions(labels)


def test_cross_entropy_on_shifted_labels_equals_the_sliced_form():
    """Whole logits against shifted labels is the usual logits[:, :-1] vs labels[:, 1:] loss."""
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    whole = F.cross_entropy(logits.transpose(1, 2), shifted_labels(LABELS), ignore_index=IGNORE)
    sliced = F.cross_entropy(logits[:, :-1].transpose(1, 2), LABELS[:, 1:], ignore_index=IGNORE)
    torch.testing.assert_close(whole, sliced)


@pytest.mark.parametrize("side, expected_ids, expected_mask", [
    ("right", [[1, 2, 3], [4, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 0, 0], [0, 0, 0]]),
    ("left", [[1, 2, 3], [0, 0, 4], [0, 0, 0]], [[1, 1, 1], [0, 0, 1], [0, 0, 0]]),
])
def test_pad_rows_places_rows_on_their_side(side, expected_ids, expected_mask):
    ids, mask = pad_rows([[1, 2, 3], [4], []], 0, side=side)
    assert ids.tolist() == expected_ids and mask.tolist() == expected_mask
    assert ids.dtype == mask.dtype == torch.long


def test_pad_rows_to_a_given_width():
    ids, mask = pad_rows([[9]], -1, width=3)
    assert ids.tolist() == [[9, -1, -1]] and mask.sum() == 1
