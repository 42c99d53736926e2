"""Analysis of the models: parameter and MAC counts (``profile``), the README's model table
(``report``), pictures of features and attention (``visualize``)."""
