"""KV-cache block bookkeeping: a free list of fixed-size blocks and each sequence's block table."""

from __future__ import annotations

from collections import deque


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens KV slots."""
    return (num_tokens + block_size - 1) // block_size


class BlockAllocator:
    """A free list over block ids 0..num_blocks-1 of the paged KV cache."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage_ratio(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache: {n} blocks requested, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"KV cache: block {b} freed but not allocated")
            self._used.remove(b)
            self._free.append(b)


class BlockTables:
    """Each sequence's block table (by request id): grown as its cached tokens grow, released all at once."""

    def __init__(self, allocator: BlockAllocator, block_size: int):
        self.allocator = allocator
        self.block_size = block_size
        self._tables: dict[str, list[int]] = {}

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def capacity(self, seq_id: str) -> int:
        """KV slots this sequence could cover with its own blocks plus every free block."""
        return (len(self.table(seq_id)) + self.allocator.num_free) * self.block_size

    def grow(self, seq_id: str, num_tokens: int) -> bool:
        """Make the table cover num_tokens slots; False (and no change) when too few blocks are free."""
        table = self._tables.setdefault(seq_id, [])
        need = blocks_for(num_tokens, self.block_size) - len(table)
        if need > 0:
            if not self.allocator.can_allocate(need):
                if not table:
                    del self._tables[seq_id]
                return False
            table.extend(self.allocator.allocate(need))
        return True

    def release(self, seq_id: str) -> None:
        self.allocator.free(self._tables.pop(seq_id, []))
