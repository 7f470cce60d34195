"""The one seed-mixing function, against its documented formula."""

import torch

from dreambooth.seeds import generator, mix


def test_mix_is_the_documented_polynomial_modulo_two_to_the_63():
    m = 1_000_003
    assert mix(7) == 7
    assert mix(7, 2) == 7 * m + 2
    assert mix(7, 2, 5) == ((7 * m + 2) * m + 5) % 2**63
    big = 2**62 + 12345
    assert mix(big, big, big) == ((big * m + big) * m + big) % 2**63
    assert mix(2**63) == 0 and mix(2**63 + 5) == 5  # every seed fits torch's manual_seed as a positive int64


def test_mix_depends_on_order_and_on_every_part():
    assert mix(1, 2) != mix(2, 1)
    assert len({mix(0, stream, index) for stream in range(4) for index in range(100)}) == 400


def test_generator_draws_the_same_numbers_for_the_same_parts():
    first = torch.randn(5, generator=generator(3, 1, 4))
    assert torch.equal(first, torch.randn(5, generator=generator(3, 1, 4)))
    assert not torch.equal(first, torch.randn(5, generator=generator(3, 1, 5)))
    assert torch.equal(first, torch.randn(5, generator=torch.Generator().manual_seed(mix(3, 1, 4))))
