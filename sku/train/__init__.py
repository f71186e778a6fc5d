"""Training: methods (loss weights as data), config (settings and recipes), batch (the rows of
a step), model and loss (the fused CE/KL over final hidden states), loop, checkpoint, and
unlearn (stage 1 then stage 2, into a run folder)."""
