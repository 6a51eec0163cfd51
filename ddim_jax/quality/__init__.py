"""Sample quality: KID and Frechet distances, the Inception network, the offline digits metric."""
