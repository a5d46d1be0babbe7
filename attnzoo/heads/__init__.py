"""Task heads (DCAL, conditional cross-attention, OAT)."""
