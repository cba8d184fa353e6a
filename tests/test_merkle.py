"""RFC 6962 trees against the Certificate Transparency test vectors, and proofs by property."""

from hypothesis import given, settings, strategies as st

from inhouse.governance import merkle

CT_DATA = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243",
                                      "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [  # (0-based leaf index, tree size, audit path)
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
]
LEAVES = [merkle.leaf_hash(d) for d in CT_DATA]


def test_roots_match_the_ct_vectors():
    for n in range(9):
        assert merkle.root(LEAVES[:n]).hex() == CT_ROOTS[n]


def test_inclusion_proofs_match_the_ct_vectors():
    for index, size, path in CT_INCLUSION:
        proof = merkle.inclusion_proof(LEAVES[:size], index)
        assert [p.hex() for p in proof] == path
        assert merkle.verify_inclusion(LEAVES[index], index, size, proof,
                                       bytes.fromhex(CT_ROOTS[size]))


def _leaves(n):
    return [merkle.leaf_hash(b"record-%d" % i) for i in range(n)]


def test_every_proof_of_every_small_tree_verifies_and_a_wrong_one_does_not():
    for n in range(1, 40):
        leaves = _leaves(n)
        r = merkle.root(leaves)
        for i in range(n):
            proof = merkle.inclusion_proof(leaves, i)
            assert merkle.verify_inclusion(leaves[i], i, n, proof, r)
            assert not merkle.verify_inclusion(merkle.leaf_hash(b"x"), i, n, proof, r)
        for m in range(1, n + 1):
            proof = merkle.consistency_proof(leaves, m)
            old = merkle.root(leaves[:m])
            assert merkle.verify_consistency(m, n, old, r, proof), (m, n)
            if m < n:
                assert not merkle.verify_consistency(m, n, merkle.leaf_hash(b"x"), r, proof)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 64), data=st.data())
def test_changing_any_leaf_breaks_consistency_with_the_old_root(n, data):
    leaves = _leaves(n)
    m = data.draw(st.integers(1, n - 1))
    old_root = merkle.root(leaves[:m])
    tampered = list(leaves)
    tampered[data.draw(st.integers(0, m - 1))] = merkle.leaf_hash(b"forged")
    proof = merkle.consistency_proof(tampered, m)
    assert not merkle.verify_consistency(m, n, old_root, merkle.root(tampered), proof)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300), st.lists(st.integers(1, 300), max_size=20))
def test_roots_at_many_sizes_in_one_pass_equal_each_root(n, sizes):
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    sizes = [s for s in sizes if s <= n] + [n]
    got = merkle.roots_at(leaves, sizes)
    assert got == {s: merkle.root(leaves[:s]) for s in sizes}
