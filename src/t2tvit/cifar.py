"""CIFAR-10/100 facts the code needs without the archives: class names and the transfer recipe's statistics.

The class names are in the order of the archives' label indices (``batches.meta`` ``label_names`` of
CIFAR-10, ``meta`` ``fine_label_names`` of CIFAR-100), which is the order of the reference CIFAR
transfer checkpoints' heads.
"""
from typing import Tuple

# the normalisation of the reference transfer script (transfer_learning.py)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

CIFAR10_CLASSES: Tuple[str, ...] = (
    'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')

CIFAR100_CLASSES: Tuple[str, ...] = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split())
