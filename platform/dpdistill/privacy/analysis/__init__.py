"""Pure accounting maths, one accountant per module: PLD (the authority), RDP, PRV (opacus) and GDP/CLT.

Functions here take mechanisms and numbers and return numbers; they hold no state beyond caches.
"""
