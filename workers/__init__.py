"""prunetune worker side: what runs inside a trial (space, prune, recalibrate BN, score, fine-tune). Needs no Ray."""
